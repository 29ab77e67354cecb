"""captioning"""
