"""atheris harness for the dns entry point (see run.py and README.md)."""
import run

if __name__ == '__main__':
    run.main('dns')
