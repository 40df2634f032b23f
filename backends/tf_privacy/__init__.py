"""TensorFlow Privacy backend (runs in its own environment: see requirements.txt)."""
