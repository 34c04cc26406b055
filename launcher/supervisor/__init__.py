"""The forkserver's supervisor: starting it (or attaching to one), restarting it, and talking to it."""
