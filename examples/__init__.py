"""Code a merchant's application copies; the tests run it as written."""
