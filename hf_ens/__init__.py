"""hf-ens: ensembles and soups of fine-tuned Hugging Face models (the library layer; never imports `trainers`)."""
