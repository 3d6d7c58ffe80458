"""atheris harness for the imap entry point (see run.py and README.md)."""
import run

if __name__ == '__main__':
    run.main('imap')
