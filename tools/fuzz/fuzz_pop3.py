"""atheris harness for the pop3 entry point (see run.py and README.md)."""
import run

if __name__ == '__main__':
    run.main('pop3')
