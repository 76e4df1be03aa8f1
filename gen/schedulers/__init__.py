"""Samplers we implement ourselves (today: UniPC over flow sigmas for Wan); diffusers' schedulers serve the rest."""
