"""kbitc.compiler: front end, FX passes, codegen and the artifact writer (built on kbitc.runtime)."""
