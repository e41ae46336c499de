"""The experiment layer: a config's one reader (`spec`), its assets, the pieces every run is
assembled from, the records a run leaves and the runner that walks a job's runs through its
stages (`stages/`). It imports the library (metrics, models, data, train, ...) and never the
report or the command line.

Submodules are imported on demand; this package imports nothing itself.
"""
