"""`clrk dev`: an in-process OTLP receiver and a live terminal UI over a running gateway."""
