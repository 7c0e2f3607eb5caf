"""Stand-alone tools on checkpoints that are not recipes (`mergelang extract-lora`)."""
