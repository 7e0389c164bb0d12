"""The Hugging Face VLM wrapper ``vtok.wrap`` on tiny random-weight models.

``make test-hf4`` runs this folder again under transformers 4.57; keep only wrapper tests here.
"""
