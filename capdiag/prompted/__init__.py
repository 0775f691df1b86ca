"""Prompted captioners: vision-language models from transformers (LLaVA, Qwen2-VL, ...) fed what their
processor writes (``pixel_values`` and the family's extras, ``input_ids`` with image placeholders,
``attention_mask``, ``labels`` with -100), with a prompt before the caption.

A subject kind of its own (``PromptedSubject``), beside the ``model(images, captions)`` contract: the
folder or model file that makes one (``folder``, ``subject``), the batches and the prompt/caption split
(``batches``), and the measurements the checks judge it by (``labels``, ``probes``, ``generation``,
``parts``). It imports the core and intake; checks import it; measure and intake never import it.
"""
