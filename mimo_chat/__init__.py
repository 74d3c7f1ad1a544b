"""MIMO Chat: talk with medical images and get answers grounded to segmentation masks."""

__version__ = "0.1.0"
