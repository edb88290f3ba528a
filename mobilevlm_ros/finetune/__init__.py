"""LoRA fine-tuning of a published MobileVLM checkpoint on LLaVA-style data (docs/FINETUNE.md).

- data.py: the reference's training data format, prompt template and label masking, validated record by record.
- lora.py: LoRA on the decoder's Linear layers in PEFT's semantics and file layout; merging into the weights.
- train.py: the training loop and the outputs (the adapter, optionally a merged checkpoint), written atomically.
- cli.py: ``mobilevlm finetune``; bag_to_dataset.py: ``mobilevlm bag-to-dataset``.
- demo.py: the proof on the bundled demo model (a skill it has never seen, taught from generated scenes).
"""
