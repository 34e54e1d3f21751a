"""pokemon-gemma: fine-tune Gemma 3 on 4-frame Pokemon gameplay to predict the next button."""

__version__ = "0.1.0"
