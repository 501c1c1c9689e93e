"""The site side of fedscdd: a thin Flower ClientApp over `shared/`."""
