"""Training the bundled default model: corpus (`data`), BPE tokenizer (`tokenizer`), V3 load balancing (`balance`),
the training loop (`train`), its plot (`plot`) and the expert-specialisation measure (`specialisation`)."""
