"""Graph capture, op vocabulary, placement planning and applying."""
