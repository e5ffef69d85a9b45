"""Model-card body templates (string.Template, ``$name`` placeholders), shipped as package data
mdp_hf.hub_cards; the card's metadata is written by huggingface_hub's ModelCardData (mdp_hf.hub.model_card)."""
