"""A small trained toy world (procedural renders, tiny SD-shaped diffusion model, LoRAs, judges)."""
