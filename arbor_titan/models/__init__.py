"""Model families. Each family has args (flavors), a model, and its parallelization plans."""
