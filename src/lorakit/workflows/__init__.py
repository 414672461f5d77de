"""Commands built from the stages: eval, sweep, synth (with the teacher), improve, the demo."""
