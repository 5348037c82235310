"""`mailfilter serve`: options, start-up, reload, signals, drain, workers."""
