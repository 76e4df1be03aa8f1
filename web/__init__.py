"""The web UI (Gradio), mounted by the server at /ui."""
