"""The fedscdd ClientApp: one thin handler per message type (decode -> client.tasks -> encode).

Exception text travels to the coordinator, so handlers re-raise fedscdd errors (whose messages
never hold data values) as they are and replace any other exception by its type name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import tasks
from client.control_state import load_control, save_control
from client.optimizer_state import drop_carries, load_carry, save_carry
from client.privacy import SiteDP
from client.site import (
    SiteData,
    SiteProfile,
    cache_dir,
    load_local_only,
    load_members,
    load_profile,
    load_site,
    resolve_source,
    save_local_only,
    save_members,
    source_key,
)
from shared.device import resolve_device
from shared.errors import FedscddError
from shared.privacy.mechanisms import site_secret
from shared.protocol import DistillRequest, EvaluateRequest, Plan, PretrainRequest, ProfileRequest, SiteSpec

logger = logging.getLogger(__name__)

app = ClientApp()


class SiteTaskError(RuntimeError):
    """A site task failed for a reason that is not a fedscdd error; the text names the type only."""


@contextmanager
def safe_errors(action: str) -> Iterator[None]:
    """Let fedscdd errors through; turn any other exception into a message that carries no data."""
    try:
        yield
    except FedscddError:
        raise
    except Exception as exc:  # noqa: BLE001 - deliberately broad: nothing unvetted may reach the server
        logger.error("%s failed at this site with %s", action, type(exc).__name__)
        msg = f"{action} failed at the site with {type(exc).__name__}; the site operator can see the site's log"
        raise SiteTaskError(msg) from None


def _site(context: Context, spec: SiteSpec, plan: Plan | None = None) -> SiteData:
    """Return the node's prepared data (aligned to the plan's genes when given)."""
    threads = int(context.run_config.get("torch-threads", 1))
    if threads > 0:
        torch.set_num_threads(threads)
    source = resolve_source(context.node_config, context.run_config)
    genes = plan.genes if plan is not None else None
    return load_site(source, spec, genes, cache=cache_dir(context.node_config))


def _profile(context: Context, spec: SiteSpec) -> SiteProfile:
    """The node's profile statistics, streamed from its file (the all-gene matrix is never held in memory)."""
    return load_profile(
        resolve_source(context.node_config, context.run_config), spec, cache=cache_dir(context.node_config)
    )


def _device(context: Context) -> torch.device:
    """Where this site's models run: run config ``device`` (``cpu`` by default; ``auto`` takes a GPU when this node has
    one)."""
    return resolve_device(str(context.run_config.get("device", "cpu")))


def _dp(context: Context, spec: SiteSpec) -> SiteDP | None:
    """The site's DP context when the run asks for DP (None otherwise)."""
    if not spec.dp.enabled:
        return None
    cache = cache_dir(context.node_config)
    return SiteDP(
        spec.dp, site_secret(cache), cache, source_key(resolve_source(context.node_config, context.run_config))
    )


@app.query("profile")
def profile(msg: Message, context: Context) -> Message:
    """query.profile: per-gene and per-label aggregates of the training cells."""
    with safe_errors("query.profile"):
        req = ProfileRequest.from_record(msg.content)
        reply = tasks.profile_site(_profile(context, req.spec), _dp(context, req.spec))
    return Message(reply.to_record(), reply_to=msg)


@app.train("pretrain")
def pretrain(msg: Message, context: Context) -> Message:
    """train.pretrain: local VAE/SCDG steps, or latent moments."""
    with safe_errors("train.pretrain"):
        req = PretrainRequest.from_record(msg.content)
        training = req.stage in ("vae", "scdg") and req.keep_optimizer
        drop_carries(context.state, keep=req.stage if training else None)
        adam = load_carry(context.state, req.stage, req.round, req.model_config) if training else None
        own = None
        if req.control is not None:
            zeros = {n: np.zeros_like(v) for n, v in req.control.items()}
            own = load_control(context.state, req.stage, req.model_config, zeros)
        reply = tasks.pretrain_site(
            _site(context, req.plan.spec, req.plan), req, _dp(context, req.plan.spec), _device(context), adam, own
        )
        if adam is not None:
            save_carry(context.state, req.stage, req.round, req.model_config, adam)
        if own is not None and reply.control_delta is not None:
            save_control(
                context.state, req.stage, req.model_config, {n: own[n] + d for n, d in reply.control_delta.items()}
            )
    return Message(reply.to_record(), reply_to=msg)


@app.train("distill")
def distill(msg: Message, context: Context) -> Message:
    """train.distill: k codes per local class (warm start from the previous round's codes the server sends back)."""
    with safe_errors("train.distill"):
        drop_carries(context.state)  # pretraining is over
        req = DistillRequest.from_record(msg.content)
        reply, seeds = tasks.distill_site(
            _site(context, req.plan.spec, req.plan), req, _dp(context, req.plan.spec), _device(context)
        )
        if seeds is not None:  # a warm start keeps the seeds of the round its codes started from
            save_members(
                cache_dir(context.node_config),
                context.run_id,
                resolve_source(context.node_config, context.run_config),
                seeds,
            )
    return Message(reply.to_record(), reply_to=msg)


@app.evaluate("models")
def evaluate(msg: Message, context: Context) -> Message:
    """evaluate.models: score the server's models on held-out real cells."""
    with safe_errors("evaluate.models"):
        req = EvaluateRequest.from_record(msg.content)
        cache, source = cache_dir(context.node_config), resolve_source(context.node_config, context.run_config)
        members = load_members(cache, context.run_id, source)
        key = tasks.local_only_key(req)
        reply = tasks.evaluate_site(
            _site(context, req.plan.spec, req.plan), req, members, load_local_only(cache, source, key), _device(context)
        )
        save_local_only(cache, source, key, reply.local_only)
    return Message(reply.to_record(), reply_to=msg)
