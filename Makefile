.PHONY: test demo dev bench
test:        ## install with test deps and run the suite (what CI runs)
	bash scripts/test.sh
demo:        ## install and run the quickstart report
	bash scripts/demo.sh
dev:         ## editable install for development
	python3 -m pip install -e ".[test]"
bench:       ## CPU benchmarks; each appends to bench/RESULTS.md
	python3 bench/quantize_cpu.py
