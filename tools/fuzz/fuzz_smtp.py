"""atheris harness for the smtp entry point (see run.py and README.md)."""
import run

if __name__ == '__main__':
    run.main('smtp')
