"""Backbones trained elsewhere, converted to the weights files lungxray's backbones load."""
