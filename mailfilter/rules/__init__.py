"""The rule side: control files, the compiler, regexes, the binary bundle format and loader."""
