"""Training of the latent stage: the autoencoder, the latent cache, the paired U-Nets, tuning of the latent
defaults, export of the bundle, and one time-boxed run on a lent GPU (``device``).

    python -m usb_training.latent.train_autoencoder --tier tiny --work RUN
    python -m usb_training.latent.latents           --tier tiny --work RUN
    python -m usb_training.latent.train_diffusion   --tier tiny --work RUN
    python -m usb_training.latent.export            --tier tiny --work RUN --out BUNDLE
"""
