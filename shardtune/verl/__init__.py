"""Drop-in entry points for users of verl's two SFT trainers (same command lines, same data, same outputs)."""
