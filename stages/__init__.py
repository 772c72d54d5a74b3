"""One module per `rgsd-pipeline` stage command; each reads top to bottom like a recipe."""
