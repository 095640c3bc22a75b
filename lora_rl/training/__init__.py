"""What every run shares: atomic checkpoints and adapter files (checkpoint), the output directory and its lock
(run_dir, lock), the resume point and trimmed run files (resume), optimizer and RNG state (state), non-finite
guards and clipping (guards), Ctrl-C (interrupt), several processes (distributed), trackers (trackers).

May import: the foundation only (recipe, data, display, builtin). Never models, adapters, rl, commands or cli.
"""
