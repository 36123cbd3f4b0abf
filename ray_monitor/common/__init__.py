"""The shared layer: value types, names and rules that every process imports."""
