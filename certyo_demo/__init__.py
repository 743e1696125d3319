"""Demo mode: a made-up product catalog that keeps changing, and the `make demo` driver.

`certyo-demo seed` fills `products` once, `certyo-demo churn` keeps editing it so the sensor
has something to do, and `certyo-demo run` drives the whole pipeline from the command line.
"""
