"""Entry points: `engine-serve` and its flags and config files. The only package that knows
both the engine and the REST bridge (it starts the bridge as a child process)."""
