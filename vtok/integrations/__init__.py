"""Integrations of vtok with serving engines: ``vtok.integrations.vllm`` (a vLLM plugin, docs/vllm.md)."""
