"""Pruned-model formats (own ``model_type``): a ``configuration_mdp_<format>.py`` and a
``modeling_mdp_<format>.py`` per format, transformers' convention.

These files import only torch and transformers (and ``configuration_mdp_common.py``, the structure fingerprint
every format's configuration mixes in, which transformers copies with them as a relative import):
``save_pretrained`` copies them next to the weights so ``trust_remote_code=True`` loads a pruned model without
mdp_hf installed. The family that defines a format
registers its classes with the Auto API (``ModelFamily.pruned_classes`` in ``mdp_hf/adapters/``); this
package registers nothing itself, so import the classes from their modules.
"""
