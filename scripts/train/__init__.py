"""Training scripts of the evaluation models, run from the repository root as modules: ``python -m scripts.train.NAME``.

``train_eval_vit`` (the eval ViT, ``make eval-vit``), ``train_vlm`` (the small VLM, ``make vlm``) and
``train_vlm_clip`` (the small VLM on the real CLIP tower). Running them as modules keeps this folder off ``sys.path``,
so no script name can shadow an installed package. The 1D tokenizers train through ``vtok train-tokenizer``
(``vtok/tokenizers_img/train.py``).
"""
