"""One module per `recnext` sub-command; each holds argument parsing and rendering only."""
