"""The run machinery behind one seam: the CLI, pre-flight checks, the run directory (lock, resume plan,
the registry of the files a run writes), checkpoint I/O, cluster, trackers and the plumbing callbacks.
The research core (models, data, classifier, callbacks) never imports this package."""
