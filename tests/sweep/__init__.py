"""vtok sweep / vtok report: config, runner, store, Ray backend, faults, and the lmms-eval plugin."""
