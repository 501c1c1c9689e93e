"""The coordinator side of fedscdd: ServerApp, orchestration, fusion, run outputs and the `scdd` CLI."""
