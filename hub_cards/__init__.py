"""Model-card templates (string.Template, ``$name`` placeholders), shipped as package data mdp_hf.hub_cards."""
