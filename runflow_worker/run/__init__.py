"""One run: the contract, inputs, the pipeline, outputs, storage and the run record."""
