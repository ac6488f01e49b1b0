"""A tiny app for the worker tests: every handled message appends `<worker> <pid> <seq>` to a file."""
