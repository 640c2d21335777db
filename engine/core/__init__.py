"""The engine core: what runs the model step by step, in the engine core process (or on a
step thread of the serving process with `--engine-core thread`): EngineCore (schedule ->
execute -> update), the step loop, its typed messages, and the Request it owns."""
