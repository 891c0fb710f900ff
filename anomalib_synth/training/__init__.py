"""Lightning training of the diffusion adapters (the torch cores live in ``anomalib_synth.synthesizers.diffusion``)."""
