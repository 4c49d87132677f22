"""The synthetic web world: a test bed and demo source (known scenes and caption noise), not a stage."""
