"""Intake: what the user brings, turned into a ``Subject``.

A model file (``modelfile``: ``build_model()``, ``CAPDIAG`` hints, ``sample_batch``, ``loss_fn``) or a
Hugging Face folder (``hf_folder``), the hints (``hints``), a checkpoint (``checkpoints``: the one
state-dict reader), the user's captions and images (``userdata``) and tokenizer (``tokenizers``), or
capdiag's synthetic batch (``data``); ``prompted`` checks a vision-language folder's processor against
its model; ``subject`` probes what the hints leave out and assembles the
``Subject`` every check runs on. Nothing here measures a model: it only calls it the documented way.
"""
