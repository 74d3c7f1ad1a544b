"""The Gradio app: ``build_demo(predictor) -> gr.Blocks``; ``python app.py`` or ``mimo-chat app`` runs it."""

from mimo_chat.app.ui import build_demo

__all__ = ["build_demo"]
